"""gkd-infer's result file: JSON lines, written whole and flushed, that a crashed run resumes.

Each line carries a key (`gkd_infer_key`) naming the input row and response it holds, so a rerun skips
what is done. The settings that wrote the file stand beside it (OUT.jsonl.gkd-infer.json): a rerun with
other settings is refused rather than mixing two kinds of samples in one file.
"""

import json
import logging
import os
import tempfile

from gkd.errors import GKDUserError

logger = logging.getLogger(__name__)

KEY_FIELD = "gkd_infer_key"
SETTINGS_SUFFIX = ".gkd-infer.json"


def check_result_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not path.endswith(".jsonl"):
        raise GKDUserError(f"--result_path {path}: name a .jsonl file (one JSON object a line)")
    if not os.path.isdir(folder):
        raise GKDUserError(f"--result_path {path}: the folder {folder} does not exist")
    # A real write, not os.access: root passes permission checks on read-only mounts that still refuse.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as error:
        raise GKDUserError(f"--result_path {path}: cannot write there ({error.strerror})") from None


class ResultFile:
    def __init__(self, path: str, settings: dict):
        self.path = path
        self.settings_path = path + SETTINGS_SUFFIX
        self.settings = settings
        self.handle = None

    def open(self) -> set[str]:
        """Open for appending; returns the keys already written. Refuses other settings."""
        check_result_path(self.path)
        if os.path.exists(self.path):
            done = self._resume()
        else:
            done = set()
            temporary = self.settings_path + ".tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.settings, handle, indent=1, sort_keys=True)
            os.replace(temporary, self.settings_path)
        self.handle = open(self.path, "a", encoding="utf-8")
        return done

    def _resume(self) -> set[str]:
        if not os.path.exists(self.settings_path):
            raise GKDUserError(
                f"--result_path {self.path}: exists but was not written by gkd-infer (no {self.settings_path} "
                "beside it); name another file"
            )
        try:
            with open(self.settings_path, encoding="utf-8") as handle:
                stored = json.load(handle)
        except (OSError, ValueError) as error:
            raise GKDUserError(f"{self.settings_path}: cannot read gkd-infer's settings ({error})") from None
        if not isinstance(stored, dict):
            raise GKDUserError(f"{self.settings_path}: not gkd-infer's settings")
        differing = [name for name in sorted(set(stored) | set(self.settings))
                     if stored.get(name) != self.settings.get(name)]
        if differing:
            changes = "; ".join(f"{name}: {stored.get(name)!r} then, {self.settings.get(name)!r} now"
                                for name in differing)
            raise GKDUserError(
                f"--result_path {self.path}: was written with other settings ({changes}); rerun with the same "
                "flags to resume, or name another file"
            )

        done, complete_bytes = set(), 0
        with open(self.path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.endswith(b"\n"):
                    break  # a killed writer's partial last line: cut below, and its row is sampled again
                try:
                    done.add(json.loads(line)[KEY_FIELD])
                except (ValueError, KeyError, TypeError):
                    raise GKDUserError(f"{self.path}:{line_number}: not a gkd-infer result line") from None
                complete_bytes += len(line)
        if complete_bytes < os.path.getsize(self.path):
            logger.warning("%s: dropping a partial last line left by an interrupted run", self.path)
            os.truncate(self.path, complete_bytes)
        return done

    def write(self, rows: list[dict]) -> None:
        """Append whole lines and push them to disk: a crash after this loses none of them."""
        self.handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
