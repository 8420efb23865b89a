"""The search's Ray session: joining a cluster or starting a local Ray, with Ray's own printing kept off the terminal.

Unless asked for (``MEDPEFT_WORKER_LOGS=1``, ``medpeft-ray search --verbose``), Ray's notices go
to ``<session>/logs/medpeft-driver.log``: :func:`start_ray` hooks into Ray's loggers, Python's
warnings and Ray's private printer of the raylet's notices for that.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import ray
import ray._private.worker as ray_worker
from ray.util.annotations import RayDeprecationWarning

from medpeft_ray.errors import MedpeftError
from medpeft_ray.search.cluster import DRIVER_RESOURCE, DRIVER_SLOTS


def connect(address: str | None) -> None:
    """Joins the Ray cluster at ``address`` (``auto``: the one this machine belongs to), or starts a local
    Ray with the driver resource; nothing when Ray is up already.

    Raises:
        MedpeftError: nothing answers at ``address``, or no Ray cluster is there.
    """
    if ray.is_initialized():
        return
    # Ray's own notices (token authentication, worker counts, deprecations) and the trials' output
    # reach the terminal only when asked for: MEDPEFT_WORKER_LOGS=1 or `medpeft-ray search --verbose`
    verbose = bool(os.environ.get("MEDPEFT_WORKER_LOGS"))
    level = logging.WARNING if verbose else logging.INFO  # INFO lands in the session log, not the terminal
    if address:
        hint = (
            "start one (`ray start --head --port 6380`, `ray up clusters/aws-gpu.yaml`) or leave --address out "
            "to run on a local Ray"
        )
        # Ray retries an address where nothing listens for minutes; a refused connection says it at once.
        host, sep, port = address.rpartition(":")
        if sep and host and port.isdigit() and "://" not in address:
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as exc:
                raise MedpeftError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); {hint}") from None
        try:
            start_ray(lambda: ray.init(address=address, log_to_driver=verbose, logging_level=level), verbose)
        except ConnectionError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedpeftError(f"--address {address}: no Ray cluster to join ({reason}); {hint}") from None
    else:
        start_ray(
            lambda: ray.init(resources={DRIVER_RESOURCE: DRIVER_SLOTS}, log_to_driver=verbose, logging_level=level),
            verbose,
        )


def start_ray(init: Callable[[], Any], verbose: bool) -> None:
    """Calls ``init`` (a ``ray.init``); unless ``verbose``, Ray's own output goes to its session log.

    For the rest of the process, ``<session>/logs/medpeft-driver.log`` receives the ``ray``
    loggers' records (token authentication notices, Tune's warnings), Python warnings raised in
    Ray's code or of Ray's deprecation category, and the notices the raylet sends the driver
    ("N PYTHON worker processes have been started ..."), which Ray prints even without
    ``log_to_driver``. Records from before the session folder exists are held and written to it
    once it does; if ``init`` fails they go to the terminal with the error, as without this.
    """
    if verbose:
        init()
        return
    ray_logger = logging.getLogger("ray")
    terminal = list(ray_logger.handlers)
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    for handler in terminal:
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(held)
    ray_code = os.path.dirname(ray.__file__) + os.sep
    show_warning = warnings.showwarning
    # Ray's private printer of the raylet's notices; a Ray without it leaves those notices alone
    print_notice = getattr(ray_worker, "print_to_stdstream", None)

    def ray_warning(message: Any, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        if issubclass(category, RayDeprecationWarning) or filename.startswith(ray_code):
            ray_logger.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            show_warning(message, category, filename, lineno, *rest)

    def raylet_notice(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", ()):
            ray_logger.warning("(%s) %s", data.get("pid", "raylet"), line)

    def back_to_terminal() -> None:
        warnings.showwarning = show_warning
        if print_notice is not None:
            ray_worker.print_to_stdstream = print_notice
        ray_logger.removeHandler(held)
        for handler in terminal:
            ray_logger.addHandler(handler)
            for record in held.buffer:
                handler.handle(record)

    warnings.showwarning = ray_warning
    if print_notice is not None:
        ray_worker.print_to_stdstream = raylet_notice
    try:
        init()
    except BaseException:
        back_to_terminal()
        raise
    try:
        log_file = logging.FileHandler(os.path.join(ray_worker._global_node.get_logs_dir_path(), "medpeft-driver.log"))
    except (AttributeError, OSError):  # no session folder to write to: the search goes on, as if verbose
        back_to_terminal()
        return
    log_file.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
    held.setTarget(log_file)
    held.flush()
    ray_logger.removeHandler(held)
    ray_logger.addHandler(log_file)
