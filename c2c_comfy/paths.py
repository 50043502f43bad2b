"""The ``models/c2c_projectors`` folder: registered once, ``.safetensors`` only; start-up cleanup."""
import os

import folder_paths

from . import files

FOLDER = "c2c_projectors"
EXTENSIONS = {".safetensors"}


def register() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=False)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    files.cleanup_at_startup()


def projector_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def projector_path(name: str) -> str:
    """Resolve a name only inside the registered folders (no absolute paths, no '..')."""
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def projector_fingerprint(name) -> str:
    """Changes whenever the named bundle is replaced (also by Train C2C Projector) or removed."""
    if not isinstance(name, str):
        return "invalid"
    path = folder_paths.get_full_path(FOLDER, name)
    return files.fingerprint(path) if path else "missing"
