// A small markdown renderer for the model's answers: fenced code blocks, headings, lists, block
// quotes and paragraphs; inline code, bold and italics. It builds DOM nodes and puts the answer's text
// only into text nodes, never into innerHTML, so HTML in an answer is shown as text, not run.
// Links are left as the text they are (an answer's link is not followed from the page), and so are
// tables. An unclosed code fence (an answer still streaming) runs to the end.

const FENCE = /^\s*```\s*([\w+.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
const QUOTE = /^>\s?(.*)$/;
const INLINE = /`([^`]+)`|\*\*(.+?)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*/g;

export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if ((match = line.match(FENCE))) {
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;  // past the closing fence
      fragment.append(codeBlock(code.join("\n"), match[1]));
    } else if ((match = line.match(HEADING))) {
      fragment.append(element(`h${match[1].length}`, inline(match[2])));
      i++;
    } else if ((match = line.match(LIST_ITEM))) {
      const ordered = /\d/.test(match[1]);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && (match = lines[i].match(LIST_ITEM)) && /\d/.test(match[1]) === ordered) {
        list.append(element("li", inline(match[2])));
        i++;
      }
      fragment.append(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (match = lines[i].match(QUOTE)); i++) quoted.push(match[1]);
      fragment.append(element("blockquote", [renderMarkdown(quoted.join("\n"))]));
    } else if (!line.trim()) {
      i++;
    } else {
      const paragraph = [];
      for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) {
        if (paragraph.length) paragraph.push(document.createElement("br"));
        paragraph.push(...inline(lines[i]));
      }
      fragment.append(element("p", paragraph));
    }
  }
  return fragment;
}

function startsBlock(line) {
  return [FENCE, HEADING, LIST_ITEM, QUOTE].some((pattern) => pattern.test(line));
}

function codeBlock(code, language) {
  const block = element("pre", [element("code", [code])]);
  if (language) block.dataset.language = language;
  return block;
}

// Text with `code`, **bold** and *italics* as nodes (strings become text nodes in append()).
function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    nodes.push(text.slice(last, match.index));
    if (match[1] !== undefined) nodes.push(element("code", [match[1]]));
    else if (match[2] !== undefined) nodes.push(element("strong", inline(match[2])));
    else nodes.push(element("em", inline(match[3])));
    last = match.index + match[0].length;
  }
  nodes.push(text.slice(last));
  return nodes;
}

function element(tag, children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}
