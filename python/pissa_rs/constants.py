"""The names pissa_rs gives the files it writes, in one place."""

# In an output folder (the residual model)
# The initial adapter of a decomposition (of OUT's residual; for a method that leaves the base as it
# is, of the original model). A LoRA of another model (extract-lora's, to-lora's) is OUT itself.
ADAPTER_SUBDIR = "pissa_init"
REPORT_NAME = "pissa_report.json"  # written last: its presence means the output is complete
PLOTS_SUBDIR = "pissa_plots"
# In an adapter folder (PEFT's names, and ours beside them)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PARAM_WRAPPERS = "pissa_param_wrappers.json"  # which ParamWrapper layer adapts which parameter (PEFT does not say)
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, PARAM_WRAPPERS)
# While a decomposition runs (removed by its commit)
RUN_FILE = ".pissa_run.json"  # the identity of the run that writes (or wrote) OUT
UNITS_DIR = ".pissa_units"  # each unit's journal, records, adapter part and done mark
LOCK_FILE = ".pissa_lock"  # the output's lock where the filesystem has no flock
CONTROL_FILES = (RUN_FILE, UNITS_DIR, LOCK_FILE)
# What a decomposition adds to a model folder: never copied on into another model (merge).
OWN_NAMES = (ADAPTER_SUBDIR, REPORT_NAME, PLOTS_SUBDIR)
