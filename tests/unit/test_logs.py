"""blob_pyro.logs: third-party chatter off for entry points, idempotently."""

import logging

from blob_pyro.logs import quiet_library_logs


def test_each_bitsandbytes_notice_passes_once_and_the_filter_is_added_once():
    quiet_library_logs()
    quiet_library_logs()
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(logger.filters) == 1
    once = logger.filters[0]
    record = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "inputs will be cast to float16", None, None)
    other = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "another notice", None, None)
    assert once.filter(record) and not once.filter(record) and once.filter(other)
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
