"""Input formats for ``data_pipeline.prepare``: each turns files into validated RawChunks (see common.py).

    FORMATS["aliccp" | "csv" | "table"] -> the Source class
"""

from data_pipeline.formats.aliccp import AliccpSource
from data_pipeline.formats.common import BadRows, FieldDef, PrepareError, RawChunk, Source
from data_pipeline.formats.csvfmt import AITM_FIELDS, CsvSource
from data_pipeline.formats.table import TableSource

FORMATS = {"aliccp": AliccpSource, "csv": CsvSource, "table": TableSource}

__all__ = ["AITM_FIELDS", "FORMATS", "AliccpSource", "BadRows", "CsvSource", "FieldDef", "PrepareError", "RawChunk",
           "Source", "TableSource"]
