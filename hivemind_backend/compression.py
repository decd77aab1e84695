"""Codec names users pass (``compression=``, ``HIVEMIND_COMPRESSION``) and the native codec ids.

The formats and their error envelopes are in docs/compression.md.
"""

# Values are averaging::CodecId (csrc/averaging/codec.h); never renumber.
CODECS = {
    "none": 0,
    "scaled_float16": 1,
    "float16": 2,
    "quantile8": 3,
    "uniform8": 4,
    "blockwise8": 5,
}


def codec_id(name, source: str = "compression") -> int:
    """The codec id of ``name`` (case-insensitive; ``None`` means "none"). Raises ValueError
    naming ``source`` and the valid names otherwise."""
    key = "none" if name is None else str(name).strip().lower()
    if key not in CODECS:
        raise ValueError(f"{source}: unknown codec {name!r}; valid: {', '.join(CODECS)}")
    return CODECS[key]
