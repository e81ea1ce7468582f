"""Missing-modality classification (MoRA section 4): CLIP + head, native dataset readers, MMP-style
missing tables, training and scoring (``stages/classify.py``)."""

from mllm.classify.datasets import DatasetFormatError, Sample, read_split
from mllm.classify.missing import MissingSpec, load_or_make_missing_table, make_missing_table
from mllm.classify.model import TUNERS, MissingModalityClassifier, apply_tuner

__all__ = ["TUNERS", "DatasetFormatError", "MissingModalityClassifier", "MissingSpec", "Sample", "apply_tuner",
           "load_or_make_missing_table", "make_missing_table", "read_split"]
