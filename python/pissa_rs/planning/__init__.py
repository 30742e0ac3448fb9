"""Planning: the only code that builds models with transformers and PEFT; it makes the plan a decomposition runs."""
