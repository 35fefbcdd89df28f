"""loramix: X-LoRA, a mixture of LoRA experts gated per token and per layer (Buehler & Buehler, 2024)."""

__version__ = "0.1.0"

from .config import XLoraConfig  # noqa: E402
from .model import XLoraModel, XLoraOutput  # noqa: E402
from .training import TrainResult, train_expert, train_xlora  # noqa: E402
from .evaluation import evaluate  # noqa: E402

__all__ = ["XLoraConfig", "XLoraModel", "XLoraOutput", "TrainResult", "train_expert", "train_xlora", "evaluate", "__version__"]
