"""The one exception family of `model`: callers catch ModelError and print its one-line message."""


class ModelError(Exception):
    """Base of every error the inference library raises on bad input or bad files."""


class ConfigError(ModelError):
    """A config is missing fields or holds values the engine cannot run."""


class CheckpointError(ModelError):
    """An HF checkpoint directory cannot be read: missing files, wrong shapes, unknown dtype."""


class PackageError(ModelError):
    """A model package is malformed, incomplete, or would be overwritten."""


class IntegrityError(PackageError):
    """A shard's bytes do not match the hash or size its manifest records."""


class BudgetError(ModelError):
    """A memory budget is too small for what must stay resident."""


class InputError(ModelError):
    """Input the engine cannot run: token ids that are not ints of the vocabulary, text that is not
    valid Unicode (a lone surrogate cannot be encoded as UTF-8)."""


class KernelError(ModelError):
    """The native kernels could not be built or loaded (no compiler, a failed build, a library of
    another ABI), or `ST_KERNEL` names no backend."""


class IsaError(ModelError):
    """`ST_KERNEL_ISA` names an instruction set this CPU lacks, or none we build."""
