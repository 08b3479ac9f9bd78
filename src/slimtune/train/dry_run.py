"""What `train` says about a warm start, and what `train --dry_run` checks and prints.

The restore plan is printed as a summary (counts by scope, every problem with its fix); the
tensor-by-tensor list goes to `train_dir/restore_plan.txt` (and to the terminal with --verbose).
A dry run resolves every setting the real run would, prints them, creates nothing, and exits
non-zero when the real run would stop (a restore problem, nothing left to train).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from torch import nn

from ..config import TrainConfig, config_to_dict
from ..errors import ConfigError, RestoreError

RESTORE_PLAN_FILENAME = "restore_plan.txt"


def restore_and_report(model: nn.Module, config: TrainConfig, say: Callable[[str], None], is_main: bool = True):
    """Restore --checkpoint_path as configured; print the plan's summary (or all of it with
    --verbose) and save the full plan in train_dir, also when the restore is refused."""
    from ..checkpoint.restore import restore

    saved: Optional[Path] = None if config.dry_run or not is_main else Path(config.train_dir) / RESTORE_PLAN_FILENAME
    try:
        plan = restore(model, config.checkpoint_path, exclude_scopes=config.checkpoint_exclude_scopes or (),
                       name_map=config.checkpoint_name_map or None, ignore_missing_vars=config.ignore_missing_vars,
                       dry_run=config.dry_run)
    except RestoreError as error:
        plan = getattr(error, "plan", None)
        if plan is None:
            raise
        if saved is not None:
            saved.write_text(plan.report() + "\n", encoding="utf-8")
        if config.verbose:
            say(plan.report())
        refused = RestoreError(plan.summary_report(str(saved) if saved else None))
        refused.plan = plan  # type: ignore[attr-defined]
        raise refused from None
    if saved is not None:
        saved.write_text(plan.report() + "\n", encoding="utf-8")
    say(plan.report() if config.verbose else plan.summary_report(str(saved) if saved else None))
    return plan


def finish_dry_run(config: TrainConfig, plan: Any, trainable_count: int, total_count: int,
                   say: Callable[[str], None], resolved: dict[str, Any]) -> None:
    """Print the resolved settings; raise (non-zero exit) where the real run would stop."""
    if trainable_count == 0:
        raise ConfigError(f"--trainable_scopes {config.trainable_scopes!r} leaves nothing to train")
    from ..preprocessing.factory import resolve_preprocessing_name

    resolve_preprocessing_name(resolved.get("preprocessing") or "")
    settings = {"settings": config_to_dict(config), "resolved": {**resolved, "trainable_parameters": trainable_count,
                                                                 "parameters": total_count}}
    text = yaml.safe_dump(json.loads(json.dumps(settings, default=str)), sort_keys=False)
    say("dry run: resolved settings\n" + text.rstrip())
    if plan is not None and not plan.ok:
        fix = plan.fix()
        raise RestoreError(f"dry run: the restore plan has {len(plan.problems)} problem(s), listed above; the real "
                           f"run would stop there" + (f" (fix: {fix})" if fix else ""))
    say(f"dry run: {trainable_count:,} of {total_count:,} parameters would train; nothing was trained or written")
