"""A zoo benchmark's finished models, kept while it runs: a run of hours that is killed or
crashes starts again where it stopped. Each model's result is written (atomically) to
`<parts_dir>/<model>.pkl` with the settings it was measured with; a rerun with the same
settings takes it instead of measuring again, and the parts are removed once the report is
written."""
import os
import pickle
from typing import Any, Dict, Optional

from segslim.fileio import remove_path, write_bytes
from segslim.logger import logger


def _path(parts_dir: str, model: str) -> str:
    return os.path.join(parts_dir, model + '.pkl')


def load_part(parts_dir: Optional[str], model: str, settings: Dict[str, Any]) -> Any:
    """The result kept for `model` when it was measured with `settings`, else None."""
    if not parts_dir or not os.path.isfile(_path(parts_dir, model)):
        return None
    try:
        with open(_path(parts_dir, model), 'rb') as f:
            kept, result = pickle.load(f)
    except Exception:  # a file of another version of the code: measure again
        return None
    if kept != settings:
        return None
    logger.info('%s: measured by an earlier run with the same settings (%s); kept', model,
                _path(parts_dir, model))
    return result


def save_part(parts_dir: Optional[str], model: str, settings: Dict[str, Any],
              result: Any) -> None:
    if parts_dir:
        os.makedirs(parts_dir, exist_ok=True)
        write_bytes(_path(parts_dir, model), pickle.dumps((settings, result)))


def clear_parts(parts_dir: Optional[str]) -> None:
    if parts_dir:
        remove_path(parts_dir)
