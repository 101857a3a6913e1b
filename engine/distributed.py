"""The Dask executor: a run's (layer, backend) computations on the workers of a Dask cluster.

The client (this process) plans, as in-process: it picks the backend, looks each result up in
the store by content hash, and sends only what is missing, one task per (layer, backend) with
that layer's weights and the request, never the model. Workers only compute; results come back
to the client, which stores each in its own transaction as it arrives, so resume, dedupe and
exactly-once rows hold as they do in-process. Dask is imported here, and only when asked for.

Resources (``dask worker --resources "GPU=1 MEMORY=64e9"``):
- ``GPU``: every task of a ``--device cuda`` run asks for one, so it lands on a GPU worker only.
- ``MEMORY`` (bytes): where the workers declare it, a task whose estimated working memory
  (``Backend.memory``) is at least ``BIG_TASK_BYTES`` asks for its estimate, so a worker never
  runs more big layers at once than it holds. A layer whose estimate fits no worker (by ``MEMORY``, else by the
  workers' memory limits) is refused before it is sent: a failed row that says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specprof.engine.base import Backend
from specprof.engine.errors import MissingExtraError, SpecprofError
from specprof.engine.limits import format_bytes
from specprof.engine.profile import (
    Executor,
    ExecutorLost,
    InProcess,
    Task,
    TaskResult,
    run_task,
)
from specprof.engine.types import Layer, Request

if TYPE_CHECKING:
    from distributed import Client, Future

SCHEDULER_ENV = "SPECPROF_SCHEDULER"
"""The scheduler address used when neither ``--workers`` nor ``--scheduler`` is given."""
GPU = "GPU"
MEMORY = "MEMORY"
BIG_TASK_BYTES = 256 * 2**20
"""Tasks estimated to need at least this much memory carry a ``MEMORY`` annotation."""
WORKER_WAIT_S = 60.0
"""How long to wait for a first worker on a cluster that has none, before giving up."""
CONNECT_TIMEOUT_S = 20.0


def task_memory(task: Task) -> int:
    """Bytes ``task`` may need on a worker: its backend's own estimate (``Backend.memory``),
    else ``memory_estimate``."""
    try:
        estimate = task.backend.memory(task.layer, task.request)
    except SpecprofError:
        estimate = None
    return int(estimate) if estimate is not None else memory_estimate(task.layer, task.request)


def memory_estimate(layer: Layer, request: Request) -> int:
    """Bytes a backend may need to compute ``layer``'s spectrum, for backends that give no
    estimate of their own: a rough upper estimate, the largest of: a values-only SVD of the weight matrix (LAPACK's copy, workspace and the
    Gram-sized blocks), the complex symbol of a convolution on its input grid, and the dense
    operator where it is small enough (``request.max_dense``) that a backend may build it.
    """
    itemsize = 4 if request.precision == "float32" else 8
    rows = int(layer.weight.shape[0])
    cols = int(math.prod(layer.weight.shape[1:]))
    estimate = itemsize * (3 * rows * cols + 4 * min(rows, cols) ** 2) + layer.weight.nbytes
    if layer.is_conv and layer.input_shape is not None:
        grid = math.prod(layer.input_shape[1:])
        channels_out = layer.out_channels // layer.groups
        channels_in = layer.in_channels // layer.groups
        symbol = 16 * 3 * layer.groups * channels_out * channels_in * grid
        output = math.prod(layer.output_shape) if layer.output_shape else layer.input_size or 0
        side = max(output, layer.input_size or 0)
        dense = 8 * 3 * output * (layer.input_size or 0) if side <= request.max_dense else 0
        estimate = max(estimate, symbol, dense)
    return int(estimate)


def compute_on_worker(backend_class: type[Backend], layer: Layer, request: Request) -> TaskResult:
    """What a worker runs for one task: the backend built there, then ``run_task``.

    The class travels, not the instance: a backend sizes itself (threads) to the machine it
    runs on.
    """
    support = backend_class.available()
    if not support:
        return TaskResult(None, f"backend '{backend_class.name}' is unavailable on the worker "
                                f"({support.reason}); install it where the workers run")
    return run_task(backend_class(), layer, request)


def warm_worker() -> None:
    """Import the engine and the built-in backends on a worker before its first task, so
    the first layers do not wait for imports."""
    from specprof.engine.plugins import get_registry

    get_registry().available_backends()


@dataclass(frozen=True)
class ClusterRoom:
    """What the cluster's workers hold, as far as the client can tell."""

    workers: int
    threads: int
    memory: int | None
    """The most memory one task may use on some worker (bytes); None: no limit known."""
    declares_memory: bool
    """Whether the workers declare a ``MEMORY`` resource (then big tasks are annotated)."""
    gpus: bool

    @classmethod
    def of(cls, client: Client) -> ClusterRoom:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        declared = [int(w.get("resources", {}).get(MEMORY, 0)) for w in workers]
        limits = [int(w.get("memory_limit") or 0) for w in workers]
        if any(declared):
            memory: int | None = max(declared)
        elif workers and all(limits):
            memory = max(limits)
        else:
            memory = None
        return cls(workers=len(workers), threads=sum(int(w.get("nthreads", 1)) for w in workers),
                   memory=memory, declares_memory=any(declared),
                   gpus=any(w.get("resources", {}).get(GPU, 0) for w in workers))


class DaskExecutor:
    """Runs tasks on a Dask cluster through ``client``; only a few more than the cluster has
    threads are out at once, so a streamed checkpoint's layers are read as workers come free."""

    def __init__(self, client: Client, device: str = "cpu", window: int | None = None,
                 dashboard: bool = True) -> None:
        self.client = client
        self._dashboard = dashboard
        self.gpu = device.startswith("cuda")
        self.room = ClusterRoom.of(client)
        self.window = window
        """Tasks out at once; None: the cluster's threads plus two, counted at each run."""
        self.address = str(client.scheduler.address)

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address, where the scheduler serves one."""
        if not self._dashboard:
            return None
        services = self.client.scheduler_info(n_workers=0).get("services", {})
        if "dashboard" not in services:
            return None
        link = str(self.client.dashboard_link)
        # The scheduler's web server runs without the dashboard where bokeh is missing.
        return link if _answers(link) else None

    def describe(self) -> str:
        """One line about the cluster, for the user."""
        text = f"Dask scheduler {self.address}: {self.room.workers} worker(s), " \
               f"{self.room.threads} thread(s)"
        link = self.dashboard_link
        return text + (f", dashboard {link}" if link else "")

    def refuse(self, task: Task) -> str | None:
        room = self.room.memory
        if room is None:
            return None
        need = task_memory(task)
        if need <= room:
            return None
        return (f"needs ~{format_bytes(need)} of memory and the largest Dask worker holds "
                f"{format_bytes(room)}; "
                f"start workers with more (dask worker --memory-limit, --resources MEMORY=...)")

    def memory_limit(self) -> int | None:
        return self.room.memory

    def task_resources(self, task: Task) -> dict[str, float] | None:
        """The Dask resources ``task`` asks for: a GPU on a cuda run, its memory estimate
        where it is big and the workers declare ``MEMORY``; None when nothing."""
        resources: dict[str, float] = {}
        if self.gpu:
            resources[GPU] = 1
        if self.room.declares_memory:
            need = task_memory(task)
            if need >= BIG_TASK_BYTES:
                resources[MEMORY] = need
        return resources or None

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, TaskResult]]:
        import dask
        from distributed import as_completed

        self.room = ClusterRoom.of(self.client)  # workers may have come or gone since
        window = self.window or max(2, self.room.threads + 2)
        pending = iter(tasks)
        finished = as_completed(loop=self.client.loop)
        out: dict[str, tuple[Task, Future]] = {}

        def submit_next() -> bool:
            task = next(pending, None)
            if task is None:
                return False
            key = f"{task.backend.name}-r{task.run_id}-l{task.layer_id}-{uuid.uuid4().hex[:12]}"
            # A task carries its layer's weights by design (no scattered data a dead worker
            # could take with it): Dask's warning about big graphs does not apply.
            with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1 PiB"}):
                future = self.client.submit(compute_on_worker, type(task.backend), task.layer,
                                            task.request, key=key, pure=False,
                                            resources=self.task_resources(task))
            out[key] = (task, future)
            finished.add(future)
            return True

        try:
            for _ in range(window):
                if not submit_next():
                    break
            for future in finished:
                task, _ = out.pop(future.key)
                yield task, self._result(future)
                submit_next()
        finally:
            if out and self.client.status == "running":
                self.client.cancel([future for _, future in out.values()])

    def _result(self, future: Future) -> TaskResult:
        from distributed import KilledWorker

        if future.status == "finished":
            result: TaskResult = future.result()
            return result
        if future.status == "cancelled" or self.client.status != "running":
            raise ExecutorLost(f"lost the Dask scheduler at {self.address}",
                               "start it again, then rerun the command with --resume")
        error = future.exception()
        if isinstance(error, KilledWorker):
            return TaskResult(None, "every Dask worker that took this layer died computing it "
                                    "(out of memory?); give the workers more memory or skip "
                                    "the layer")
        assert error is not None
        raise error


def _answers(url: str) -> bool:
    """Whether ``url`` answers a GET with success within a second or two."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(200 <= response.status < 300)
    except (OSError, ValueError):
        return False


def scheduler_address(scheduler: str | None) -> str | None:
    """``scheduler`` if given, else ``$SPECPROF_SCHEDULER`` if set (and not empty)."""
    return scheduler or os.environ.get(SCHEDULER_ENV) or None


def _require_dask() -> None:
    if importlib.util.find_spec("distributed") is None:
        raise MissingExtraError("running on a Dask cluster (--workers, --scheduler)", "dask")


@contextlib.contextmanager
def open_executor(workers: int | None = None, scheduler: str | None = None,
                  device: str = "cpu", quiet_logs: bool = True) -> Iterator[Executor]:
    """The executor for a command: in-process by default; with ``workers`` a fresh
    ``LocalCluster`` of that many worker processes (closed at the end); with ``scheduler``
    (or ``$SPECPROF_SCHEDULER``) the cluster behind that address.

    ``quiet_logs`` keeps Dask's own log lines (reconnect attempts, worker restarts) off the
    terminal while the executor is open; what matters reaches the user as one line.
    """
    if workers is not None and scheduler is not None:
        raise SpecprofError("--workers and --scheduler both given",
                            "use --workers N for a local cluster, or --scheduler ADDRESS")
    address = None if workers is not None else scheduler_address(scheduler)
    if workers is None and address is None:
        yield InProcess()
        return
    _require_dask()
    with contextlib.ExitStack() as stack:
        if quiet_logs:
            stack.enter_context(_quiet_dask_logs())
        if workers is not None:
            client = stack.enter_context(_local_client(workers, device))
        else:
            assert address is not None
            client = stack.enter_context(_remote_client(address))
        _wait_for_a_worker(client)
        client.run(warm_worker)
        # A local cluster serves its dashboard only where bokeh is installed.
        executor = DaskExecutor(client, device, dashboard=address is not None
                                or importlib.util.find_spec("bokeh") is not None)
        if executor.gpu and not executor.room.gpus:
            raise SpecprofError(f"--device {device} but no worker of {executor.address} "
                                "declares a GPU",
                                "start GPU workers with: dask worker ADDRESS --resources GPU=1")
        yield executor


@contextlib.contextmanager
def _local_client(workers: int, device: str) -> Iterator[Client]:
    from distributed import Client, LocalCluster
    from distributed.system import MEMORY_LIMIT

    memory = int(MEMORY_LIMIT // workers)
    resources: dict[str, float] = {MEMORY: memory}
    if device.startswith("cuda"):
        resources[GPU] = 1
    dashboard = "localhost:0"
    # The worker processes' own logs at CRITICAL: at shutdown a worker can log an ERROR with
    # a traceback ("Failed to communicate with scheduler during heartbeat") when the scheduler
    # closes first; what a task raises reaches the client as its result, not as a log line.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=memory, resources=resources, dashboard_address=dashboard,
                      host="127.0.0.1", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


@contextlib.contextmanager
def _remote_client(address: str) -> Iterator[Client]:
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise SpecprofError(f"cannot reach the Dask scheduler at {address} ({_first_line(error)})",
                            "start one with 'dask scheduler', or check --scheduler / "
                            f"${SCHEDULER_ENV}") from None
    try:
        yield client
    finally:
        with contextlib.suppress(OSError, TimeoutError):
            client.close(timeout=5)


def _wait_for_a_worker(client: Client) -> None:
    if client.scheduler_info(n_workers=1)["workers"]:
        return
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (OSError, TimeoutError) as error:
        raise SpecprofError(f"no Dask worker joined {client.scheduler.address} within "
                            f"{WORKER_WAIT_S:.0f} s ({_first_line(error)})",
                            "start workers with: dask worker ADDRESS") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask's loggers (each ``distributed.*`` has its own level) raised to CRITICAL, and put
    back as they were."""
    import distributed  # noqa: F401  (importing it configures the loggers quieted here)

    names = ["distributed", "tornado", "asyncio",
             *(name for name in list(logging.Logger.manager.loggerDict)
               if name.startswith(("distributed.", "tornado.")))]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
