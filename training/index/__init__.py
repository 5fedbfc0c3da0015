"""Learnable indexes built from trained codes (MFLI); read by ``rayrec eval`` and serving."""
