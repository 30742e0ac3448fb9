"""Storage formats, one module each: the PEFT adapter, low-precision sources, bitsandbytes serialized and its reference."""
