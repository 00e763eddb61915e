"""The application commands, one module per ``segadapt`` subcommand, between the CLI and the engine.

- :mod:`~segadapt.commands.train` (``train``), :mod:`~segadapt.commands.evaluate` (``eval``),
  :mod:`~segadapt.commands.predict` (``predict``), :mod:`~segadapt.commands.pseudo_label`
  (``pseudo-label``), :mod:`~segadapt.commands.rounds` (``rounds``), :mod:`~segadapt.commands.demo`
  (``demo``), :mod:`~segadapt.commands.report` (``report``), :mod:`~segadapt.commands.make_benchmark`
  (``make-benchmark``), :mod:`~segadapt.commands.check_data` (``check-data``).

Each module holds the command's Python API (e.g. :func:`~segadapt.commands.evaluate.evaluate_checkpoint`,
:func:`~segadapt.commands.report.write_report`) and a ``run(...)`` that does what the command line
does: call it, print, return the exit status. :mod:`segadapt.cli` parses arguments and calls ``run``;
the commands use the engine, the data, the models and :mod:`segadapt.viz`; the engine never imports
a command. Nothing is imported here, so ``segadapt --help`` loads no command.
"""
