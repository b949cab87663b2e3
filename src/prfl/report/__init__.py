"""Reports: history tables, time-to-accuracy and plots, computed from run files.

* :mod:`prfl.report.analysis` -- numbers from histories (time to accuracy, statistics over seeds,
  participation imbalance, bytes, curves on a common time grid, densities, recovery events);
* :mod:`prfl.report.runset` -- a run directory, a ``prfl run`` root or a ``prfl compare``
  directory as methods x seeds;
* :mod:`prfl.report.tables` -- Markdown and CSV tables;
* :mod:`prfl.report.plots` -- matplotlib figures (PNG and SVG);
* :mod:`prfl.report.outputs` -- everything above written into a directory;
* :mod:`prfl.report.html` -- one self-contained HTML page.
"""
