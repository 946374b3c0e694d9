"""Tools around the engine, outside its import graph: ``bench`` / ``bench_peer`` / ``bench_report``
(``wanfast bench``), ``compare`` (``wanfast compare``), ``quantize`` (``wanfast quantize``), ``synthetic``
(random weights at real dimensions on the device) and the random-weight checkpoint writers of the tests and
of ``--model tiny`` (``testing``, ``testing_text``). The engine (models, loading, accel, pipeline) never
imports this package, except the builder's tiny-model path, which writes a checkpoint with ``testing``."""
