"""pipetwin's validation room: how far to trust a prediction — calibrate the cluster model, then score it on held-out runs.

Entry points: ``validation.calibrate.calibrate`` (profile, link benchmark and short runs → a
``Calibration``, saved as the files every command takes), ``validation.matrix.run_matrix`` (calibrate,
then simulate and measure every held-out configuration), ``validation.report.write_report``, and
``validation.groundtruth`` (vTrain's published A100 runs predicted and scored).

Modules: ``calibrate`` (the orchestration and its result), the fits ``compute``, ``links`` (with the
receive costs) and ``accumulation``, ``measure`` (what is timed with torch and the executor),
``events`` (the steady part of a trace), ``compare``, ``configs``, ``matrix``, ``report``, ``plots``
(Gantt charts; the face draws with them too), ``groundtruth`` (with its ``groundtruth_rows``, ``groundtruth_plan``,
``groundtruth_closed_form`` and ``groundtruth_report``), ``errors``.
Nothing is imported here, so importing one module does not pull in torch.
"""
