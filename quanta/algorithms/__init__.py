"""PTQ algorithms (Nagel et al. 2019, data-free quantization): cross-layer equalization and
high-bias absorption on the float model after BatchNorm folding; bias correction (analytical
from BatchNorm statistics, or measured on calibration data) on the simulated model. Each is a
function here and a name in `QuantConfig.algorithms`, which `quanta.prepare` / `quanta.quantize`
run in the pipeline; what each changed is recorded on the model and in the saved file."""

from .adaround import AdaRoundOptions, adaround
from .awq import AWQOptions, awq
from .best_calibration import best_calibration
from .bias_correction import activation_mean, bias_correction, empirical_bias_correction
from .equalize import absorb_high_bias, cross_layer_equalization
from .gptq import GPTQOptions, gptq
from .pairs import LayerPair, batchnorm_statistics, bn_pairs, find_pairs
from .pipeline import ALGORITHMS, ALGORITHMS_ATTR, check_algorithms
from .smoothquant import SmoothQuantOptions, smoothquant

__all__ = [
    "ALGORITHMS", "ALGORITHMS_ATTR", "AWQOptions", "AdaRoundOptions", "GPTQOptions", "LayerPair",
    "SmoothQuantOptions", "absorb_high_bias", "activation_mean", "adaround", "awq", "batchnorm_statistics",
    "best_calibration", "bias_correction", "bn_pairs", "check_algorithms", "cross_layer_equalization",
    "empirical_bias_correction", "find_pairs", "gptq", "smoothquant",
]
