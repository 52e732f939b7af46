"""Quiet model loading: diffusers' and transformers' per-component bars and notices off (our bar is the progress)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_loading():
    """Inside the block, diffusers/transformers show no loading bars and log errors only."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
