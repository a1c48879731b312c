"""Save errors as one line, from wherever torch and dist_checkpointing raise them."""

from megatron_anchor.checkpoint import failures


def test_error_descriptions_dig_out_the_os_error():
    import errno

    inner = OSError(errno.EACCES, "Permission denied", "/ck/iter_0000002.incomplete/common.pt")
    try:
        try:
            raise inner
        except OSError as err:
            raise RuntimeError("Worker failure: boom") from err
    except RuntimeError as wrapped:
        outer = wrapped

    class CheckpointException(Exception):  # torch's: each rank's (exception, traceback)
        def __init__(self, failures):
            super().__init__("CheckpointException ranks:dict_keys([0])\nTraceback ...")
            self.failures = failures

    assert failures.describe(CheckpointException({3: (outer, "tb")})) == (2, str(inner), 3)
    assert failures.describe(CheckpointException({}))[0] == 0  # others only heard of it
    assert failures.describe(EOFError("Ran out of input")) == (
        1, "EOFError: Ran out of input", None)
    # the writer's OSError crossed to the coordinator rank without its cause
    crossed = RuntimeError(f"Worker failure: {inner}")
    assert failures.describe(CheckpointException({1: (crossed, "tb")})) == (2, str(inner), 1)

    # megatron-core 0.19: the exception keeps the class only; the OS error is in its log
    bare = RuntimeError("Worker failure: An error is caught while starting worker 0, "
                        "error: <class 'OSError'>")
    logged = [f"Local worker 0 encountered an error: {inner}"]
    assert failures.describe(bare, logged) == (2, str(inner), None)


def test_logged_errors_come_back_from_a_forked_writer():
    import logging
    import multiprocessing

    logged = failures.LoggedErrors()
    source = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    with logged:  # attached while the writer forks, as in an async save
        source.warning("not an error")
        writer = multiprocessing.get_context("fork").Process(
            target=source.error, args=("Local worker 0 encountered an error:\n[Errno 28] x",))
        writer.start()
    writer.join(10)
    source.error("after the save: not this save's")
    assert writer.exitcode == 0
    assert logged.lines() == ["Local worker 0 encountered an error: [Errno 28] x"]
    assert logged.lines() == []
