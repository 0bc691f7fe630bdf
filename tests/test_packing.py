import torch

from lm_saes.activation.packing import pack_documents


def test_contexts_are_full_start_with_bos_and_separate_documents_with_eos(tiny_model) -> None:
    tok = tiny_model.tokenizer
    docs = ["the cat runs.", "a dog sees the bird and the model.", "", "   ", "one token feature vector " * 10]
    contexts = list(pack_documents(docs, tok, context_size=16))
    assert contexts and all(c.shape == (16,) for c in contexts)
    assert all(c[0].item() == tok.bos_token_id for c in contexts)
    assert all(tok.pad_token_id not in c.tolist() for c in contexts)
    # Every text token appears in order, across context boundaries, with one EOS after each non-empty doc.
    body = torch.cat([c[1:] for c in contexts]).tolist()
    expected = []
    for d in docs:
        ids = tok(d, add_special_tokens=False).input_ids
        if ids and d.strip():
            expected += ids + [tok.eos_token_id]
    assert body == expected[: len(body)]
    assert len(expected) - len(body) < 15  # only the ragged tail is dropped
