"""mixtrain_tf: verifiably robust training (MixTrain) for TensorFlow / Keras."""

from mixtrain_tf import quiet as _quiet

_quiet.quiet_start()  # only for `python -m mixtrain_tf.train|evaluate`

# ruff: noqa: E402  (the quiet start must come before TensorFlow is imported)

from mixtrain_tf.api import (
    BoundMethod,
    compute_bounds,
    margin_upper_bounds,
    per_sample_bytes,
    verified,
)
from mixtrain_tf.bound_layer import BoundLayer
from mixtrain_tf.bounds import IntervalBounds, SymbolicBounds
from mixtrain_tf.graph import (
    SelfCheckError,
    UnsupportedLayerError,
    register_bound_op,
    supported_layers,
)

__version__ = "0.1.0"

__all__ = [
    "BoundLayer", "BoundMethod", "IntervalBounds", "SelfCheckError",
    "SymbolicBounds", "UnsupportedLayerError", "compute_bounds",
    "margin_upper_bounds", "per_sample_bytes", "register_bound_op",
    "supported_layers", "verified",
]
