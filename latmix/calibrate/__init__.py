"""Calibration: learning the transforms of a prepared model (LATMiX end to end, or FlatQuant layer-wise).

learn       the one call, calibrate(), and its two modes
trainer     the trainable parameters and the optimizer steps on them (shared by both modes)
smooth      the data-driven start of the affine maps' per-channel scales (calib.smooth_alpha)
measure     what is measured and watched: quantization points, bound, error, losses, non-finite guard
checkpoint  the checkpoint file: atomic, fingerprinted, resumable
"""

from latmix.calibrate.checkpoint import CheckpointMismatch
from latmix.calibrate.learn import CalibrationReport, StepCallback, calibrate
from latmix.calibrate.measure import NonFiniteError

__all__ = ["CalibrationReport", "CheckpointMismatch", "NonFiniteError", "StepCallback", "calibrate"]
