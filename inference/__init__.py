"""Using a trained global model: predictions and explanations for clinicians.

Runs offline, on a laptop or at a site, from a checkpoint (or a run folder) and a
patient's CSV rows or DICOM; explanations computed on a site's own data stay at the site
except as aggregates.
"""
