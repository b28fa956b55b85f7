"""Data pipeline: sources read unit by unit -> tokenizer -> memory-mapped packed domains -> per-rank sampling.

Names are re-exported as ``X as X`` so linters and type checkers treat them as public.
"""

from cltk.data.corpora import BUILTIN_CORPORA as BUILTIN_CORPORA
from cltk.data.corpora import MAX_DOC_CHARS as MAX_DOC_CHARS
from cltk.data.corpora import SOURCE_KINDS as SOURCE_KINDS
from cltk.data.corpora import CorpusError as CorpusError
from cltk.data.corpora import check_source as check_source
from cltk.data.corpora import iter_documents as iter_documents
from cltk.data.corpora import load_documents as load_documents
from cltk.data.corpora import sample_documents as sample_documents
from cltk.data.corpora import split_text as split_text
from cltk.data.packing import PACK_FORMAT_VERSION as PACK_FORMAT_VERSION
from cltk.data.packing import PackedDomain as PackedDomain
from cltk.data.packing import PackingError as PackingError
from cltk.data.packing import pack_domain as pack_domain
from cltk.data.packing import packed_fingerprint as packed_fingerprint
from cltk.data.tokenizer import MIN_VOCAB_SIZE as MIN_VOCAB_SIZE
from cltk.data.tokenizer import TokenizerError as TokenizerError
from cltk.data.tokenizer import load_tokenizer as load_tokenizer
from cltk.data.tokenizer import tokenizer_fingerprint as tokenizer_fingerprint
from cltk.data.tokenizer import train_tokenizer as train_tokenizer
from cltk.data.windows import TokenWindows as TokenWindows
