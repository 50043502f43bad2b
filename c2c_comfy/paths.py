"""The ``models/c2c_projectors`` folder: registered once, ``.safetensors`` only."""
import os

import folder_paths

FOLDER = "c2c_projectors"
EXTENSIONS = {".safetensors"}


def register() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=False)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def projector_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def projector_path(name: str) -> str:
    """Resolve a name only inside the registered folders (no absolute paths, no '..')."""
    return folder_paths.get_full_path_or_raise(FOLDER, name)
