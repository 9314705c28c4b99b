"""nstd: a watch-folder daemon for neural style transfer."""
__version__ = "0.1.0"
