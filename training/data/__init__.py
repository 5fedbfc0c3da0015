"""The data layer: datasets in the rayrec layout (``data/<name>/``, see docs/architecture.md).

* :mod:`training.data.schema`: the layout's Parquet schemas, file paths and fail-fast checks.
* :mod:`training.data.split`: leave-one-out by time per user, in memory and streaming.
* :mod:`training.data.movielens`: MovieLens-100K from the recbole wheel
  (``rayrec data prepare ml-100k``).
* :mod:`training.data.synth`: a streamed synthetic dataset with planted biases
  (``rayrec data synth``); its generative model is :mod:`training.data.synth_world`.
* :mod:`training.data.cache`: the download cache (``$RAYREC_CACHE``, default ``~/.cache/rayrec``).

Nothing is imported here, so importing one module stays light (the loader's torch stays out).
"""
