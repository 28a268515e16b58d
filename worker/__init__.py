"""The GPU worker: one loaded pipeline, jobs taken from its model's queue."""

import logging

# transformers says, for each image processor diffusers imports, that it falls back to the PIL one
# without torchvision. The PIL ones are all a worker needs; the lines told every start to install
# a package it does not use.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)
