"""The side-neutral platform layer: what the device (`agent`) and the operator (`stctl`) both need.

Rule: `common` imports neither `agent` nor `stctl` (nor `model`); both sides import it. It owns
atomic file writes (`common.files`), cross-process locks that work on Linux and Windows
(`common.locks`), the SQLite migration runner (`common.migrations`), the one duration grammar
(`common.durations`) and the command-line scaffolding both CLIs share (`common.cli`). Its
errors derive from `common.errors.CommonError`.
"""
