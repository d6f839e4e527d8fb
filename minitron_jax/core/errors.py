"""One base for every error minitron raises on bad input, so that the CLI reports any of them in one line
(`except MinitronError`). Each class also keeps the built-in base its callers catch (ValueError, ...)."""


class MinitronError(Exception):
    """Bad input, named with its fix: the CLI prints it on one line and exits non-zero."""


FIELD_HINT = ("pass the field that holds the text: --text-field NAME (score, eval) or text_field=NAME "
              "(distill, finetune)")


class OutputError(MinitronError, ValueError):
    """An output path that cannot be written, or whose writing would destroy data minitron did not write."""


class AssetError(MinitronError, RuntimeError):
    """A download that fails or does not match its pin, or a cached asset that does not match its marker."""


class LockError(MinitronError, FileExistsError):
    """The output directory is in use by another run, or cannot hold a lock file (a FileExistsError, so
    that `cli.main` reports it in one line)."""


class ConfigError(MinitronError, ValueError):
    """A config that this project cannot build or that transformers would not load."""


class SafetensorsError(MinitronError, ValueError):
    """A file that is not a well-formed safetensors file; raised before any tensor bytes are read."""


class CheckpointError(MinitronError, ValueError):
    """A checkpoint that does not match its config or cannot be read safely."""


class StoreError(MinitronError, ValueError):
    """A token store that is missing, incomplete, or not what it claims to be."""


class DataError(MinitronError, ValueError):
    """Input data that cannot give what was asked for."""


class EvalError(DataError):
    """An evaluation that gave no finite number."""


class ScoresError(DataError):
    """Scores that cannot be written or used: non-finite, or computed on another model."""


class PruneError(MinitronError, ValueError):
    """An infeasible pruning target, missing scores or an impossible budget."""


class RecipeError(MinitronError, ValueError):
    pass


class AOTError(RecipeError):
    """A topology that cannot be built here, or a recipe that does not fit the topology's shape."""


class ResumeError(MinitronError, RuntimeError):
    """The checkpoints cannot be resumed by this run (other shapes, unreadable settings, none restores)."""


class TrainingError(MinitronError, RuntimeError):
    pass


class Preempted(TrainingError):
    """The run stopped early (SIGTERM on any process) with a checkpoint at `step`: `minitron distill`,
    `finetune` and `run` exit with 143 (128 + SIGTERM) so that a scheduler requeues them."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class LogitsError(MinitronError, ValueError):
    """A teacher-logits store that is missing, incomplete, or does not belong to the run."""


def clip_repr(v, n: int = 60) -> str:
    """repr(v), cut to n characters with "..." (for a value quoted in an error message)."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


class StorageError(MinitronError, OSError):
    """An output that the hosts of a multi-process job do not share."""
