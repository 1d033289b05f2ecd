"""mixtrain_tf: verifiably robust training (MixTrain) for TensorFlow / Keras."""

from mixtrain_tf.api import (BoundMethod, compute_bounds, margin_upper_bounds,
                             per_sample_bytes, verified)
from mixtrain_tf.bound_layer import BoundLayer
from mixtrain_tf.bounds import IntervalBounds, SymbolicBounds
from mixtrain_tf.graph import (SelfCheckError, UnsupportedLayerError,
                               register_bound_op, supported_layers)

__version__ = "0.1.0"

__all__ = [
    "BoundLayer", "BoundMethod", "IntervalBounds", "SelfCheckError",
    "SymbolicBounds", "UnsupportedLayerError", "compute_bounds",
    "margin_upper_bounds", "per_sample_bytes", "register_bound_op",
    "supported_layers", "verified",
]
