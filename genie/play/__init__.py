"""``genie play``: a world in the browser (:mod:`genie.play.server`, :mod:`genie.play.keys`)."""
