"""Checkpoint import: each module converts one public checkpoint family into a workbench model
(``dcae``: diffusers AutoencoderDC → FSAE). Import the module you need; this package imports none."""
