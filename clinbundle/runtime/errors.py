"""User-facing errors.

Every error a user can cause (bad data, bad config, bad model URI) is a `ClinbundleError`: the CLI
prints its message without a traceback and exits with `exit_code`. Messages say what was wrong
and what to do about it.
"""

from __future__ import annotations


class ClinbundleError(Exception):
    """An error caused by input the user can fix."""

    exit_code = 2


class ConfigError(ClinbundleError):
    """The configuration or a command-line override is invalid."""


class DataError(ClinbundleError):
    """The data folder is missing, empty or inconsistent."""

    def __init__(self, problems: list[str] | str, hint: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = [f"{len(self.problems)} problem(s) with the data:"]
        lines += [f"  - {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class InputError(ClinbundleError, ValueError):
    """A volume given for inference has the wrong shape, dtype or values."""


class TrackingError(ClinbundleError):
    """The MLflow tracking server or registry cannot be used."""


class ModelResolutionError(ClinbundleError):
    """A model URI does not resolve to a registered model with an inference contract."""


class DeviceError(ClinbundleError):
    """A device was asked for explicitly and is not available."""


class BundleError(ClinbundleError):
    """A bundle folder is missing, malformed, or would overwrite something."""


class ParityError(ClinbundleError):
    """A format does not give the PyTorch answer within tolerance; nothing was written."""

    exit_code = 3


class ResumeError(ClinbundleError):
    """`--resume` names a run that cannot be continued (unknown, finished, no checkpoint)."""


class Preempted(ClinbundleError):
    """Training stopped on SIGTERM after saving and uploading `last`; resume it with --resume.

    Its own exit code (128 + SIGTERM, what a shell reports for a process ended by SIGTERM) lets a
    job scheduler tell "preempted, resume me" from a failure (1) or a user error (2).
    """

    exit_code = 143

    def __init__(self, run_id: str | None, reason: str, epoch: int, step: int) -> None:
        self.run_id, self.reason, self.epoch, self.step = run_id, reason, epoch, step
        where = f"epoch {epoch + 1} step {step}" if step else f"the end of epoch {epoch}"
        resume = f"clinbundle train --resume {run_id}" if run_id else "clinbundle train --resume"
        super().__init__(f"{reason}; `last` saved at {where}; continue with `{resume}`")
