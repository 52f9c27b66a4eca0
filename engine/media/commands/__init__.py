"""The media commands every front-end shares: TwiML verbs (engine/modules/instructions),
vendor commands (control/vendor/commands.py) and the service modules (engine/modules/services).

- `gather.Gather`: collect DTMF keys until a count, a finish key or a timeout;
- `digits`: the DTMF key table, RFC 4733 events out of a leg, in-band Q.23 tones;
- `prompt`: a prompt's PCM (spoken text or a WAV file) and a player for it;
- `urlaudio.UrlAudio`: audio from an http(s) URL, fetched once, decoded off the loop,
  kept in one byte-bounded LRU `PcmCache`.

A front-end parses and checks its own arguments (TwiML attributes, gRPC fields,
service config) and maps results and errors into its own protocol; the work is done
here, once.
"""
