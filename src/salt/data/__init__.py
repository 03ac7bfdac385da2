"""FTAG HDF5 data: the built-in sample, file access and the chunked loader.

A batch, as the loader yields it and the model consumes it, is a plain dict::

    {
      "inputs":    {"jets": f32[B, Fj], "tracks": f32[B, T, Ft], "global": f32[B, Fg]},
      "pad_masks": {"tracks": bool[B, T]},          # True marks a padded (not real) slot
      "labels":    {"jets": {"flavour_label": i64[B]},
                    "tracks": {"ftagTruthOriginLabel": i64[B, T],
                               "ftagTruthVertexIndex": i64[B, T]}},
    }

Inputs are normalised with the norm_dict and padded slots are zero. Only the input types named
in the variable lists are present ("global" only when configured). Labels already have their
task's label_map applied. T may be smaller than the file's track count: batches are trimmed to
their longest jet, real tracks first, unless the loader is told to keep the file's layout.
"""
