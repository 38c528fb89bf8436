"""svdzip: post-training SVD compression of LLMs with per-matrix rank allocation.

Importing svdzip registers its transformers quantizer, so a directory it wrote reloads with
`AutoModelForCausalLM.from_pretrained(dir)`.
"""

__version__ = "0.1.0"

from svdzip.config import CompressConfig  # noqa: E402
from svdzip.engine.pipeline import CompressionResult, compress  # noqa: E402
from svdzip.errors import SvdzipError  # noqa: E402
from svdzip.output.io import load, save  # noqa: E402  (registers the quantizer)

__all__ = ["CompressConfig", "CompressionResult", "SvdzipError", "compress", "load", "save", "__version__"]
