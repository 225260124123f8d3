"""Omni-ID trainer: dataset curation and loading, few-to-many sampling, stage 1 (masked transformer
decoder), stage 2 (flow matching through a frozen ComfyUI base), the adapter-only and Pivot ID
trainers, evaluation, and export to the weight file the Omni-ID nodes load.

Submodules (import what you need; nothing is imported here, so the node pack never loads the trainer):

* ``config``   run configuration (YAML/JSON)          * ``data``     layout, loaders, few-to-many split
* ``trunk``    CLIP trunk, inference-tensor fix        * ``mtd``      stage 1 (Eq. 4-5)
* ``flow``     stage 2 and adapter-only (Eq. 6-7)      * ``pivot``    Pivot ID encoder (OmniPortrait Eq. 5)
* ``engine``   accelerate training loop                * ``export``   weight files
* ``curate``   dataset curation (appendix Fig. II)     * ``evaluate`` ID similarity / pose error
* ``faces``    insightface embedding/pose functions    * ``cli``      command line (run as a script)
"""
