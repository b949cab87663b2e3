#!/usr/bin/env bash
# Installs Debian's Chromium for the report's browser test when it is missing and the machine
# allows (root, apt). Otherwise it says so and carries on: that test then skips with the reason.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
   || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian package chromium (for the HTML report test) ..."
  if apt-get install -y -q chromium >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "note: chromium is missing; the report's browser test will skip (apt-get install chromium)" >&2
exit 0
