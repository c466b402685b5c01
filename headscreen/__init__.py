"""headscreen: batch screening of head CT and brain MRI for a PACS.

One import root. The layers, each importing only those before it:

- here, the shared base: `errors` (the exception hierarchy), `privacy` (what may appear
  in logs and recorded reasons) and the model-bundle contract that the trainer writes and
  the daemon reads: `bundle` (manifest, hashes), `scores` (the masked terms and the
  healthy reference) and `inference` (running a bundle's ONNX graph);
- `imaging`: DICOM series to volumes, preprocessing, registration, QC, phantoms;
- `db` (persistence) and `export` (the DICOM result objects and their delivery);
- `daemon` (receiver, scheduler, worker, console, command line) and `model_training`
  (PyTorch; only the `train` command imports it).

The layer folders stay at the repository root (daemon/, db/, export/, imaging/,
model_training/, models/); this folder links to them, so a checkout, an editable install
and the wheel all import them as `headscreen.<layer>`.
"""
