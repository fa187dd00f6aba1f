"""Models: the in-memory handle, meta-data for estimates, storage codecs, saving and loading."""
