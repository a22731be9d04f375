"""Small real models and offline data shared by `quanta demo` and the tests."""

from .data import digits, majority_tokens, sine_sequences
from .models import DigitsCNN, SequenceLSTM, TinyTransformer
from .train import accuracy, train_classifier

__all__ = ["DigitsCNN", "SequenceLSTM", "TinyTransformer", "accuracy", "digits", "majority_tokens",
           "sine_sequences", "train_classifier"]
