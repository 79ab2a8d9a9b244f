"""The tiny world: the captioned pretraining data of the embedded tiny base, and its evaluation encoder.

- :mod:`edgecp.world.data` draws 64x64 RGB scenes with captions from a seed (numpy + Pillow, no torch):
  coloured, patterned shapes at named positions on named backgrounds, plus crops of the photos bundled with
  scikit-image under captions that name them ("a photo of bricks"). The photos reserved as personalization
  concepts (:data:`edgecp.world.data.RESERVED`) never appear.
- :mod:`edgecp.world.evaluator` loads the small CLIP-style image/text pair trained on that data
  (``load_evaluator(folder)``), which embeds images and captions into one L2-normalised space.

``tools/train_tiny_world.py`` trains the tiny base (VAE, evaluator, text encoder, UNet) on this world.
"""
