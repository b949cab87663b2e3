"""Executors run local training jobs: inline, or on a pool of worker processes.

Every job carries everything that decides its outcome (start weights, mask, sample indices, a
seed derived from the job's address), so any executor returns the same weights bit for bit.
Workers build their own model and data once, from a picklable :class:`WorkerSpec`.

The process pool moves no model-sized data through pipes and maps no fresh shared memory per
task: workers start while the caller is still setting up, map the caller's training data
instead of loading their own copy, and train straight into shared-memory output slots that
stay mapped on both sides (see :class:`_OutputSlots`).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from prfl.client.trainer import TrainOutput
from prfl.client.workspace import TrainJob, WorkerSpec, Workspace


@dataclass(frozen=True)
class JobSource:
    """A submitted job as a checkpoint stores it in place of its output: ``job`` without its
    start values, and ``values()``, which fetches them (packed, values at the mask then the
    suffix, when ``job.packed``). Jobs with equal ``key`` start from equal values. Executors
    attach one to the futures they return, as ``future.job_source``, for as long as the job's
    start values are at hand."""

    job: TrainJob
    key: Hashable
    values: Callable[[], torch.Tensor]


def job_source(future: Any) -> JobSource | None:
    """The :class:`JobSource` of a future an executor returned, or None if it has none."""
    src = getattr(future, "job_source", None)
    return src if isinstance(src, JobSource) else None


_EMPTY = torch.empty(0)


class _Start:
    """The start values of waiting jobs, in memory or in a file of ``spill_dir``; removed
    from disk once no job needs them. ``packed``: the values at a mask then the suffix
    (:meth:`TrainJob.pack`); otherwise the caller's whole weight vector itself, not a copy, which
    must then stay as it is until the jobs have trained (checked when they read it)."""

    def __init__(self, key: int, values: torch.Tensor, spill_dir: Path | None, packed: bool = True) -> None:
        self.key = key
        self.users = 0
        self.packed = packed
        self.path: Path | None = None
        self._values: torch.Tensor | None = values
        self._version = values._version
        if spill_dir is not None:
            self.path = spill_dir / f"start-{key}.pt"
            torch.save({"weights": values.clone()}, self.path)  # clone: only these values, not a larger storage
            self._values = None

    @property
    def nbytes(self) -> int:
        """Bytes of memory its values hold (0 on disk)."""
        return 0 if self._values is None else self._values.numel() * self._values.element_size()

    def values(self) -> torch.Tensor:
        if self._values is not None:
            if self._values._version != self._version:
                raise RuntimeError("the start weights of a waiting job were changed in place after it was submitted; "
                                   "a policy must hand out new tensors, not edit the ones its tasks start from")
            return self._values
        assert self.path is not None
        return torch.load(self.path, weights_only=True)["weights"]

    def drop(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.path is not None:
            self.path.unlink(missing_ok=True)


#: Bytes of whole start vectors the inline executor keeps by reference for its waiting masked jobs
#: (without a spill directory); beyond them it packs the values at each job's mask.
FULL_START_BYTES = 1 << 30


class _Starts:
    """One :class:`_Start` per (start weights, mask) pair of the waiting jobs: jobs dispatched
    from one model version under one mask share their packed start values (and spill file).

    Without a spill directory a masked job may instead keep its whole start vector, by reference
    (no copy), shared by every mask: packing it (a gather of the kept values) and unpacking it to
    train (zeroing a model-sized vector and scattering them back) are then both saved. The
    trainer multiplies the start by the mask either way, so training sees the same values. Whole
    starts are kept while their bytes stay within ``full_bytes`` (they may be older model
    versions the server no longer holds); beyond that, jobs are packed."""

    def __init__(self, spill_dir: Path | None, full_bytes: int | None = None) -> None:
        self.spill_dir = spill_dir
        self.full_bytes = 0 if spill_dir is not None else FULL_START_BYTES if full_bytes is None else full_bytes
        self._cache: dict[tuple[int, int], tuple[weakref.ref[torch.Tensor], Any, int, weakref.ref[_Start]]] = {}
        self._full: list[weakref.ref[_Start]] = []
        self._keys = itertools.count()

    def get(self, job: TrainJob) -> _Start:
        """The shared start of ``job`` (created if new); counts ``job`` as one of its users."""
        w, mask = job.weights, job.mask
        start = None
        if mask is not None and not job.packed and self.full_bytes:
            start = self._lookup((id(w), -2), w, None)
            if start is None and self._full_held() + w.numel() * w.element_size() <= self.full_bytes:
                start = self._remember((id(w), -2), w, None, _Start(next(self._keys), w, None, packed=False))
                self._full.append(weakref.ref(start))
        if start is None:
            key = (id(w), id(mask) if mask is not None else -1)
            start = self._lookup(key, w, mask)
            if start is None:
                start = self._remember(key, w, mask, _Start(next(self._keys), job.pack().weights, self.spill_dir))
        start.users += 1
        return start

    def _lookup(self, key: tuple[int, int], w: torch.Tensor, mask: torch.Tensor | None) -> _Start | None:
        hit = self._cache.get(key)
        start = hit[3]() if hit is not None and hit[0]() is w and hit[2] == w._version else None
        if start is not None and mask is not None and hit is not None and hit[1]() is not mask:
            start = None
        return start

    def _remember(self, key: tuple[int, int], w: torch.Tensor, mask: torch.Tensor | None, start: _Start) -> _Start:
        mask_ref: Any = weakref.ref(mask) if mask is not None else (lambda: None)
        self._cache[key] = (weakref.ref(w, lambda _, k=key: self._forget(k)), mask_ref, w._version, weakref.ref(start))
        return start

    def _full_held(self) -> int:
        """Bytes of the whole start vectors some waiting job still holds."""
        alive = [s for s in (r() for r in self._full) if s is not None and s.users > 0]
        self._full = [weakref.ref(s) for s in alive]
        return sum(s.nbytes for s in alive)

    def _forget(self, key: tuple[int, int]) -> None:
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is None:
            del self._cache[key]


@dataclass(frozen=True)
class TrainData:
    """What a worker needs of a data set to train: the training split and the model's shapes.

    The process pool hands its workers the caller's training data as shared-memory tensors in
    this form, so no worker loads (or holds a private copy of) the data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def shared_from(cls, dataset: Any) -> TrainData:
        """Copy a data set's training split into shared memory (once, in the caller)."""
        x = torch.as_tensor(dataset.x_train)
        y = torch.as_tensor(dataset.y_train, dtype=torch.int64)
        xs = torch.empty(x.shape, dtype=x.dtype).share_memory_()
        ys = torch.empty(y.shape, dtype=y.dtype).share_memory_()
        xs.copy_(x)
        ys.copy_(y)
        return cls(xs, ys, tuple(int(d) for d in dataset.input_shape), int(dataset.num_classes))


class Executor(Protocol):
    def submit(self, job: TrainJob) -> Future[TrainOutput]: ...
    def close(self) -> None: ...


class _Deferred(Future):  # type: ignore[type-arg]
    """A future that computes its value when first asked for it (``result`` or ``exception``)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self._fn = fn

    def _run(self) -> None:
        fn, self._fn = self._fn, None
        if fn is None or self.done():  # already computed, or cancelled
            return
        try:
            self.set_result(fn())
        except BaseException as exc:  # surfaced when the driver asks for the result
            self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)


class InlineExecutor:
    """Runs each job in the calling process, when its result is first asked for.

    Training is deferred rather than done at ``submit``: a task still in flight when the run
    stops (or that fails on the way) is then never trained, which is pure waste in one process.
    The outcome is the same either way, since a job carries everything that decides it.

    A waiting masked job keeps its start vector by reference while those held stay within
    :data:`FULL_START_BYTES`, else only what training reads (:meth:`TrainJob.pack`); jobs started
    from the same weights under the same mask (one model version, one density) share one copy.
    With ``spill_dir`` every start is packed and waits on disk instead: written there at the first
    such ``submit``, read back to train and removed when no waiting job needs it, so a fleet of
    thousands of clients with a task each in flight does not hold their start models in memory.
    """

    name = "inline"

    def __init__(self, spec: WorkerSpec, dataset: Any | None = None, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.workspace = Workspace(spec, dataset)
        self.spill_dir = None if spill_dir is None else _own_spill_dir(Path(spill_dir))
        if self.spill_dir is not None:  # removed at close, or when the executor goes away, or at exit
            weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
        self._starts = _Starts(self.spill_dir)

    def submit(self, job: TrainJob) -> Future[TrainOutput]:
        start = self._starts.get(job)
        light = dataclasses.replace(job, weights=_EMPTY, packed=job.packed or (job.mask is not None and start.packed))
        del job

        def run() -> TrainOutput:
            return self.workspace.run(dataclasses.replace(light, weights=start.values()))

        fut = _Deferred(run)
        fut.add_done_callback(lambda f: start.drop())  # run or cancelled: one user fewer
        fut.job_source = JobSource(light, ("inline", id(self), start.key), start.values)  # type: ignore[attr-defined]
        return fut

    def close(self) -> None:
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


_SPILL_PREFIX = "prfl-jobs-"


def _own_spill_dir(parent: Path) -> Path:
    """A new directory of this process's own under ``parent``, after removing those left there
    by processes that no longer run (a killed run's waiting jobs)."""
    parent.mkdir(parents=True, exist_ok=True)
    for d in parent.glob(f"{_SPILL_PREFIX}*-*"):
        pid = d.name[len(_SPILL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{os.getpid()}-", dir=parent))


def process_alive(pid: int) -> bool:
    """Does a process with this pid exist (ours or someone else's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass(frozen=True)
class _SlotRef:
    """Where a worker left a result tensor: the first ``numel`` floats of slot file ``name``."""

    name: str
    numel: int


class _OutputSlots:
    """Shared-memory vectors that workers train into and the caller copies results out of.

    A slot is a file of ``capacity`` float32 values (the worker's full-width model) in a
    directory on a memory file system, mapped once by each process that uses it and reused for
    the life of the pool, so a result costs one copy in the caller (into its own memory) and
    neither side maps fresh pages or sends the values through a pipe. Free slots are named in a queue that
    the caller and every worker share: a worker takes one for a task's weights (and one for its
    importance scores), trains into it and returns only the slot's name; the caller copies the
    values out as soon as the result arrives and puts the name back. A worker creates a slot
    when none is free, up to ``per_worker`` of its own; past that (the caller is slow to take
    results) it returns the tensor the ordinary way. Results are the same either way.
    """

    def __init__(self, directory: str, free: Any, per_worker: int) -> None:
        self.directory = directory
        self.free = free
        self.per_worker = per_worker
        self.capacity = 0  # set by each worker: its full-width model's size
        self._maps: dict[str, torch.Tensor] = {}
        self._created = 0

    def __getstate__(self) -> dict[str, Any]:
        # a process maps the slots itself; what it has mapped and made is its own
        return {"directory": self.directory, "free": self.free, "per_worker": self.per_worker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["free"], state["per_worker"])  # type: ignore[misc]

    def _map(self, name: str, create: bool = False) -> torch.Tensor:
        t = self._maps.get(name)
        if t is None:
            path = os.path.join(self.directory, name)
            if create:
                with open(path, "wb") as fh:
                    fh.truncate(self.capacity * 4)
            size = os.path.getsize(path) // 4
            t = torch.from_file(path, shared=True, size=size, dtype=torch.float32)
            self._maps[name] = t
        return t

    # worker side
    def take(self, numel: int) -> tuple[str, torch.Tensor] | None:
        """A free slot's name and its first ``numel`` values, or None when none can be had."""
        try:
            name = self.free.get_nowait()
        except queue.Empty:
            if self._created >= self.per_worker or numel > self.capacity:
                return None
            room = os.statvfs(self.directory)
            if room.f_bavail * room.f_frsize < 2 * 4 * self.capacity:  # a small /dev/shm (containers)
                return None
            self._created += 1
            name = f"{os.getpid()}-{self._created}.slot"
            return name, self._map(name, create=True)[:numel]
        slot = self._map(name)
        if numel > slot.numel():  # a slot of a smaller model (workers of other specs)
            self.free.put(name)
            return None
        return name, slot[:numel]

    def give(self, t: torch.Tensor | None, numel: int | None = None) -> torch.Tensor | _SlotRef | None:
        """Put ``t`` in a free slot (a copy) and return the slot's reference; ``t`` itself when
        no slot is free."""
        if t is None:
            return None
        slot = self.take(t.numel())
        if slot is None:
            return t
        slot[1].copy_(t.reshape(-1))
        return _SlotRef(slot[0], t.numel())

    # caller side
    def receive(self, ref: torch.Tensor | _SlotRef | None) -> torch.Tensor | None:
        """The values a worker left in a slot, copied into a new tensor; the slot is free again."""
        if not isinstance(ref, _SlotRef):
            return ref
        out = torch.empty(ref.numel, dtype=torch.float32)
        out.copy_(self._map(ref.name)[: ref.numel])
        self.free.put(ref.name)
        return out


def _shared_memory_dir() -> str | None:
    """A directory on a memory file system when the platform has one (Linux: /dev/shm)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def shared_memory_room() -> int | None:
    """Bytes free on /dev/shm, where torch's shared tensors live (None: no such file system).

    Containers often mount a small /dev/shm (64 MiB by default under Docker); a shared tensor
    larger than the room left fails on first write, so large copies check first."""
    d = _shared_memory_dir()
    if d is None:
        return None
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


@dataclass
class _WorkerState:
    workspace: Workspace
    slots: _OutputSlots | None


_WORKER: _WorkerState | None = None


PARENT_POLL_SECONDS = 1.0  # how often a pool worker checks that the process that started it still runs


def _exit_with_parent(parent: int, poll: float = PARENT_POLL_SECONDS) -> None:
    """A pool worker's watch: once the process that started it has ended (killed, say, so the pool
    never shut down), the worker is re-parented and exits, instead of waiting for jobs for ever
    with its model, data mapping and output slots."""
    while os.getppid() == parent:
        time.sleep(poll)
    os._exit(0)


def _init_worker(spec: WorkerSpec, data: TrainData | None = None, slots: _OutputSlots | None = None,
                 parent: int | None = None) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the process that made the pool decides what it means
    # (a headline sweep pauses at its next checkpoint), and a worker killed by it would fail its task
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:  # the pid the pool was made in: it may have ended before this worker got here
        threading.Thread(target=_exit_with_parent, args=(parent,), name="prfl-parent-watch", daemon=True).start()
    ws = Workspace(spec, data)
    if slots is not None:
        slots.capacity = ws.layout.total
    _WORKER = _WorkerState(ws, slots)


def _ready() -> int:
    """A no-op job: submitted once per worker when the pool starts, so the workers start at once."""
    return os.getpid()


def _run_job(job: TrainJob) -> TrainOutput:
    assert _WORKER is not None, "worker not initialised"
    ws, slots = _WORKER.workspace, _WORKER.slots
    if slots is None:
        return ws.run(job)
    numel = ws.trainer_for(job.width).layout.total
    slot = slots.take(numel)
    if slot is None:
        return ws.run(job)
    out = ws.run(job, out=slot[1])
    return dataclasses.replace(out, weights=_SlotRef(slot[0], numel), grad_sq=slots.give(out.grad_sq))  # type: ignore[arg-type]


class _SlotFuture(Future):  # type: ignore[type-arg]
    """The caller's future of a pool job whose result tensors wait in output slots: the values
    are copied out (and the slots freed) as soon as the job's result arrives."""

    def __init__(self, inner: Future, slots: _OutputSlots) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._inner: Future | None = inner  # type: ignore[type-arg]
        inner.add_done_callback(lambda f: self._collect(f, slots))

    def _collect(self, inner: Future, slots: _OutputSlots) -> None:  # type: ignore[type-arg]
        # The inner future keeps this callback, which refers to self: a reference cycle, which
        # would keep the result, and the job's start values with it, until Python's cycle
        # collector runs (rarely, with few objects allocated per task: dozens of models piled up
        # in a long run). Letting go of the inner future here breaks it.
        self._inner = None
        if inner.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
            return
        exc = inner.exception()
        if exc is not None:
            self.set_exception(exc)
            return
        try:
            out: TrainOutput = inner.result()
            out = dataclasses.replace(out, weights=slots.receive(out.weights), grad_sq=slots.receive(out.grad_sq))  # type: ignore[arg-type]
        except BaseException as err:  # surfaced when the caller asks for the result
            self.set_exception(err)
            return
        self.set_result(out)

    def cancel(self) -> bool:
        inner = self._inner
        return inner is not None and inner.cancel() and super().cancel()


class _SharedCopies:
    """Shared-memory copies of the tensors jobs carry, one per source tensor and version.

    Jobs dispatched from one model version (or with one mask) share its copy, as they share the
    source: memory grows with the versions and masks in flight, not with the jobs. A copy lives
    as long as a job or the source holds it (the cache keeps only weak references to both)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[weakref.ref[torch.Tensor], int, weakref.ref[torch.Tensor]]] = {}

    def get(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        hit = self._cache.get(id(t))
        if hit is not None:
            src, version, copy = hit[0](), hit[1], hit[2]()
            if src is t and version == t._version and copy is not None:
                return copy
        out = torch.empty(t.shape, dtype=t.dtype).share_memory_()
        out.copy_(t)
        key = id(t)
        self._cache[key] = (weakref.ref(t, lambda _, k=key: self._cache.pop(k, None)), t._version, weakref.ref(out))
        return out


class ProcessPoolExecutorAdapter:
    """Runs jobs on ``workers`` processes (spawned, so no state leaks from the parent).

    With ``dataset`` (the caller's loaded data set) the workers map its training split from
    shared memory instead of loading the data set themselves. ``slots``: train into shared
    output slots (:class:`_OutputSlots`; off: results travel as ordinary pickled tensors).
    The workers are started at once and build their workspaces while the caller goes on.
    """

    name = "process"

    def __init__(self, spec: WorkerSpec, workers: int = 2, dataset: Any | None = None, slots: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        # The caller evaluates models: with the workers' thread count, as under the inline
        # executor, so evaluation floats do not depend on the executor either.
        torch.set_num_threads(max(1, spec.threads))
        ctx = mp.get_context("spawn")
        data = None
        if dataset is not None:
            need = np.asarray(dataset.x_train).nbytes + np.asarray(dataset.y_train).nbytes
            room = shared_memory_room()
            if room is None or room > 2 * need:  # else the workers load the data set themselves
                data = TrainData.shared_from(dataset)
        self._slots: _OutputSlots | None = None
        self._slot_dir: str | None = None
        if slots:
            self._slot_dir = tempfile.mkdtemp(prefix="prfl-slots-", dir=_shared_memory_dir())
            self._slots = _OutputSlots(self._slot_dir, ctx.Queue(), per_worker=3)
            weakref.finalize(self, shutil.rmtree, self._slot_dir, ignore_errors=True)
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, data, self._slots, os.getpid())
        )
        self._started = [self.pool.submit(_ready) for _ in range(workers)]  # each submit starts a worker
        self._copies = _SharedCopies()

    def submit(self, job: TrainJob) -> Future[TrainOutput]:
        # The pool pickles a job later, on its feeder thread, with torch's reducers, which move a
        # tensor's storage into shared memory in place. Done to the caller's tensors while the
        # caller goes on reading them, that made runs differ in the last bits from one execution
        # to the next. So the job travels with private shared-memory copies made here, now: the
        # worker maps them (no bytes through the pipe) and the caller's tensors are left alone.
        job = dataclasses.replace(job, weights=self._copies.get(job.weights), mask=self._copies.get(job.mask))
        fut = self.pool.submit(_run_job, job)
        out = fut if self._slots is None else _SlotFuture(fut, self._slots)
        light = dataclasses.replace(job, weights=_EMPTY, packed=job.packed or job.mask is not None)
        key = ("process", id(job.weights), -1 if job.mask is None else id(job.mask))  # the copies are shared by version
        out.job_source = JobSource(light, key, lambda: job.pack().weights)  # type: ignore[attr-defined]
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._slot_dir is not None:
            shutil.rmtree(self._slot_dir, ignore_errors=True)


class RayExecutor:
    """Runs jobs on Ray actors, one :class:`Workspace` each (``ray.init()`` locally, or an address).

    The in-flight tasks of an asynchronous run are independent, so they train in parallel on the
    actors; jobs go to the actor with the fewest pending jobs (ties: lowest index). Results do
    not depend on which actor trains a job, so the history is the inline executor's.
    """

    name = "ray"

    def __init__(self, spec: WorkerSpec, workers: int = 2, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "the ray executor needs Ray: pip install 'prfl[flower]' (Flower's simulation extra brings it)"
            ) from exc
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._ray = ray
        torch.set_num_threads(max(1, spec.threads))  # the caller evaluates as under the inline executor
        self._owns_ray = not ray.is_initialized()
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: leave device vars alone
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        actor_cls = ray.remote(num_cpus=1)(_RayWorkspace)
        self.actors = [actor_cls.remote(spec) for _ in range(workers)]
        self.pending = [0] * workers

    def submit(self, job: TrainJob) -> Future[TrainOutput]:
        i = min(range(len(self.actors)), key=lambda k: (self.pending[k], k))
        self.pending[i] += 1
        fut: Future[TrainOutput] = self.actors[i].run.remote(job).future()

        def done(_: Future[TrainOutput], i: int = i) -> None:
            self.pending[i] -= 1

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()


class _RayWorkspace:
    """A Ray actor holding one Workspace."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.workspace = Workspace(spec)

    def run(self, job: TrainJob) -> TrainOutput:
        return self.workspace.run(job)


def make_executor(
    kind: str, spec: WorkerSpec, workers: int = 2, dataset: Any | None = None, address: str | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> Executor:
    """Build an executor by name: ``inline``, ``process`` or ``ray`` (``address``: a Ray cluster;
    ``spill_dir``: where the inline executor keeps waiting jobs; ``dataset``: the caller's loaded
    data set, which the inline executor trains on and the process pool shares with its workers)."""
    if kind == "inline":
        return InlineExecutor(spec, dataset, spill_dir)
    if kind == "process":
        return ProcessPoolExecutorAdapter(spec, workers, dataset)
    if kind == "ray":
        return RayExecutor(spec, workers, address)
    raise ValueError(f"unknown executor {kind!r}; choose one of: inline, process, ray")
