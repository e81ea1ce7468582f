"""Missing-modality classification (MoRA section 4): CLIP + head, native dataset readers, MMP-style
missing tables, training and scoring (``stages/classify.py``)."""

from mllm.classify.datasets import DatasetFormatError, Sample, read_split
from mllm.classify.missing import MissingSpec, load_or_make_missing_table, make_missing_table
from mllm.classify.model import MissingModalityClassifier, prepare_clip_for_tuner

__all__ = ["DatasetFormatError", "MissingModalityClassifier", "MissingSpec", "Sample", "load_or_make_missing_table",
           "make_missing_table", "prepare_clip_for_tuner", "read_split"]
