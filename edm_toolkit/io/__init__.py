"""Files: what the toolkit reads and writes, bounded by the file's content and never executing anything from it.

``formats`` is the registry of model (and detector) file formats and the one bounded way a network described by
a file is built; ``tensorfile`` reads torch zip, legacy and safetensors files within their own sizes;
``images`` reads folders and zips of images (datasets, FID) and writes PNGs and grids; ``outputs`` is the one
atomic writer (umask permissions, stale temporary files of killed runs removed). ``edm_toolkit.loading`` and
``edm_toolkit.checkpoints`` are the public faces of the model files.
"""
