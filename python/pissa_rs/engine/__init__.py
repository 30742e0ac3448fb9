"""The engine: runs a plan as units of work and commits them; never imports transformers or PEFT."""
