"""Files a user receives (issue 15, items 15, 18 and 20): a tuner config checked whole against its schema and its
checksum, damaged model folders refused in one line, folders saved by the installed libraries accepted, and saved
folders with the umask's permissions."""

import os
import stat

from conftest import tiny_unet
from PIL import Image

from restune_sd import attach, preset, save_tuner
from restune_sd.images import write_validation_folder


def test_saved_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tuner = save_tuner(attach(tiny_unet(), preset("lora-r4", "unet")), tmp_path / "tuner")
        validation = write_validation_folder([[Image.new("RGB", (8, 8))]], ["a prompt"], tmp_path / "validation")
    finally:
        os.umask(old)
    for folder in (tuner, validation):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
