"""Training data: TFDS/array_record datasets of images with captions, cached text
embeddings or class labels (``records``), and grain input pipelines (``pipeline``)."""
