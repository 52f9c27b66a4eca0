"""Media: RTP endpoints, codecs, DTMF, mixing and the media clock."""
