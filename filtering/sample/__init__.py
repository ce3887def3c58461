"""The bundled synthetic domain: procedural shape images with captions, the sample
pool generator (:func:`filtering.sample.make.make_sample`) and the script that trains
the tiny CLIP shipped in ``sample_data/tiny_clip``."""
